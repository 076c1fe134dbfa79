"""Registered Iris models, reached from outside a Kedro run: resolve ``models:/iris/3``, fetch its bundle.

The ``iris`` console script (``segment``, ``review``) needs what ``register_model`` recorded, without a
Kedro session: the version's tags, its run (params, metrics), the safetensors bundle (the run's
``model_bundle`` artifact, or the pyfunc model's ``artifacts/bundle``) and the resolved project parameters
(the run's ``config/parameters.json`` artifact). Every failure is a :class:`RegistryError` with one line
saying which URI and what went wrong, never an MLflow traceback.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iris_pipelines.inference.bundle import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BundleError,
    ModelBundle,
    bundle_directory,
)
from iris_pipelines.sqlite_store import absolute_sqlite_uri

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # conf/base/mlflow.yml, relative to the project directory
BUNDLE_ARTIFACT = "model_bundle"  # register_model logs the bundle directory under this run path
PARAMETERS_ARTIFACT = "config/parameters.json"  # ... and all resolved parameters here
# evaluate tags the version with the run that produced its eval.* tags, and logs the settings it used there
EVALUATION_RUN_TAG = "evaluation_run_id"
# Where evaluate ran (cpu, cuda:0): a GPU's numbers differ from a CPU's in the last bits.
EVALUATION_DEVICE_TAG = "evaluation_device"
EVAL_TAG_PREFIX = "eval."  # ... and its mean Dice as eval.<group>.<method>.dice
EVAL_TAG_DECIMALS = 6  # tag values are strings; a review compares a recomputation at this precision
EVALUATION_PARAMETERS_ARTIFACT = "config/evaluation_parameters.json"
# mlflow.pyfunc copies the "bundle" artifact under artifacts/<its folder name>; register_model saves the
# bundle in a folder named BUNDLE_ARTIFACT.
PYFUNC_BUNDLE = f"artifacts/{BUNDLE_ARTIFACT}"

# register_model creates a version with all its tags at once; a version without these (registered by an
# earlier release whose tagging failed midway) lacks its provenance and the hash its weights are checked by.
REQUIRED_VERSION_TAGS = ("git_commit", "weights_sha256")

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w.-]+))$")
# What MLflow answers for a version or alias that does not exist (as opposed to a store it cannot reach).
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class RegistryError(RuntimeError):
    """A registry URI that cannot be resolved or read; the message names the URI and the problem."""


def is_registry_uri(model: str) -> bool:
    return str(model).startswith("models:/")


def tracking_uri(option: str | None, project_dir: str | os.PathLike[str] | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the project's ``sqlite:///mlflow.db``: the
    store conf/base/mlflow.yml gives `kedro run` (the variable when set, else the project's SQLite file).

    A relative SQLite file (the default, or one in the variable) is taken relative to ``project_dir`` (the
    current directory when None), where `kedro run` opens it (ProjectRootHooks runs from the project root).
    """
    if option:
        return option
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or DEFAULT_TRACKING_URI
    return uri if project_dir is None else absolute_sqlite_uri(uri, project_dir)


# settings.py's CONFIG_LOADER_ARGS as far as finding mlflow.yml and credentials.yml goes. Not imported from
# there: settings imports kedro-mlflow, which sets up Kedro's logging (its handlers, an info.log in the
# current directory) and warns, in every iris command that reads the registry (tests/test_registry.py
# checks that the two agree).
CONFIG_LOADER_ENVS = {"base_env": "base", "default_run_env": "local"}
MLFLOW_CONFIG_PATTERNS = ["mlflow*", "mlflow*/**", "**/mlflow*"]


def export_credentials(project_dir: str | os.PathLike[str], env: str | None) -> list[str]:
    """Export the MLflow server login that ``kedro run --env=<env>`` exports, for this process; notes.

    kedro-mlflow reads ``server.credentials`` of the env's ``mlflow.yml`` (conf/hpcc: ``mlflow_server``) and
    exports every key of that credentials entry (``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``
    or ``MLFLOW_TRACKING_TOKEN``, an artifact store's keys) as an environment variable. The same is done
    here through Kedro's OmegaConfigLoader, except that a variable already set wins over the file. A
    missing file or entry is a note (the server's 401 then says the rest); no note or message holds a
    value, and the errors of reading credentials are named by type only (a YAML error quotes the line it
    failed on).
    """
    from kedro.config import MissingConfigException, OmegaConfigLoader
    from omegaconf import OmegaConf

    conf = Path(project_dir) / "conf"
    shown = env or CONFIG_LOADER_ENVS["default_run_env"]
    try:
        loader = OmegaConfigLoader(
            conf_source=str(conf),
            env=env,
            config_patterns={"mlflow": MLFLOW_CONFIG_PATTERNS},
            **CONFIG_LOADER_ENVS,
        )
        # server.credentials alone, unresolved: the rest of mlflow.yml needs settings.py's resolvers, and
        # conf/hpcc's tracking URI an $MLFLOW_TRACKING_URI that --tracking-uri may stand in for here. The
        # env's files override base's, key by key (the soft merge settings.py asks for).
        base, overrides, *_ = loader._read_raw_config("mlflow")
        server: dict[str, Any] = {}
        absent = object()
        for config in [*base.values(), *overrides.values()]:
            named = OmegaConf.select(config, "server.credentials", default=absent)
            if named is not absent:
                server["credentials"] = named
    except MissingConfigException:
        return []  # not a Kedro project: nothing names a login
    except Exception as error:  # noqa: BLE001 - an unreadable mlflow.yml: said, not fatal
        return [f"cannot read mlflow.yml of {conf} (env {shown}) for the server login: {_one_line(error)}"]
    key = server.get("credentials")
    if not key:
        return []
    try:
        entry = loader["credentials"].get(key)
    except MissingConfigException:
        return [
            f"mlflow.yml of env {shown} names credentials {key!r}, but {conf} has no credentials.yml "
            f"(in {conf / 'base'} or {conf / shown}): continuing without the MLflow server login"
        ]
    except Exception as error:  # noqa: BLE001 - never quote the file: it holds the password
        return [
            f"cannot read the credentials.yml of {conf} (env {shown}): {type(error).__name__}; "
            "continuing without the MLflow server login"
        ]
    if not isinstance(entry, dict) or not entry:
        return [
            f"mlflow.yml of env {shown} names credentials {key!r}, but no credentials.yml of {conf} "
            f"(base, {shown}) has that entry: continuing without the MLflow server login"
        ]
    kept = []
    for name, value in entry.items():
        if value is None:
            continue
        if os.environ.get(str(name)):
            kept.append(str(name))
        else:
            os.environ[str(name)] = str(value)
    if kept:
        return [f"{', '.join(kept)} already set in the environment: used instead of credentials {key!r}"]
    return []


def _check_reachable(uri: str) -> None:
    """A missing SQLite file would be created empty by MLflow (and then 'model not found'): say so."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :].split("?", 1)[0])  # SQLAlchemy options follow a "?"
        if not path.is_file():
            raise RegistryError(
                f"no MLflow database at {path} (tracking URI {uri}); run from the project directory, "
                "or pass --tracking-uri / set MLFLOW_TRACKING_URI"
            )


def _client(uri: str) -> Any:
    # Fail fast on an unreachable server instead of MLflow's minutes of retries (the user may override).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the CLI shows its own progress
    _check_reachable(uri)
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as error:  # noqa: BLE001 - an unsupported scheme or a retired file store: one line
        raise RegistryError(f"cannot open the MLflow tracking URI {uri}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:299] + "…"


_UNREAD = object()  # an artifact not read yet (None is "read, and absent")

# kedro-mlflow tags each run with Kedro's run_params, among them ``run_id``: the Kedro session id, which
# Kedro also uses as the save version of every versioned dataset the session writes. An
# ``input_version.<name>`` tag therefore names the session, and so the MLflow run, that saved that input.
SESSION_TAG = "run_id"
LINEAGE_LOOKUPS = 50  # data versions looked up at most (each a search of the experiment's runs)


@dataclass
class ProducingRun:
    """An MLflow run that saved data the model was made from, and which (dataset, version) it saved."""

    run: Any
    saved: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RegisteredModel:
    """One registered model version with its run: what ``register_model`` and ``evaluate`` recorded.

    ``run`` is None when the version has no (readable) source run; ``problems`` lists what could not be
    read, so a review reports it instead of failing.
    """

    uri: str
    name: str
    version: str
    tracking_uri: str
    tags: dict[str, str]
    run_id: str | None
    run: Any | None
    model_id: str | None
    client: Any = field(repr=False)
    problems: list[str] = field(default_factory=list)
    _evaluation_run: Any | None = field(default=None, init=False, repr=False)
    _evaluation_run_read: bool = field(default=False, init=False, repr=False)
    _evaluation_parameters: Any = field(default=_UNREAD, init=False, repr=False)
    _lineage: list[ProducingRun] | None = field(default=None, init=False, repr=False)

    @property
    def params(self) -> dict[str, str]:
        return dict(self.run.data.params) if self.run is not None else {}

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.run.data.metrics) if self.run is not None else {}

    @property
    def run_tags(self) -> dict[str, str]:
        return dict(self.run.data.tags) if self.run is not None else {}

    def metric_history(self, key: str) -> list[Any]:
        if self.run_id is None:
            return []
        try:
            return list(self.client.get_metric_history(self.run_id, key))
        except Exception:  # noqa: BLE001 - a review shows what it can read
            return []

    def _artifact_json(self, run_id: str, artifact: str) -> dict[str, Any] | None:
        with tempfile.TemporaryDirectory(prefix="iris-params-") as scratch:
            try:
                path = self.client.download_artifacts(run_id, artifact, scratch)
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception as error:  # noqa: BLE001 - missing artifact or unreadable JSON: reported
                self.problems.append(f"{artifact} artifact of run {run_id}: {_one_line(error)}")
                return None

    def parameters(self) -> dict[str, Any] | None:
        """The run's ``config/parameters.json`` (all resolved params at training time), None when absent."""
        return None if self.run_id is None else self._artifact_json(self.run_id, PARAMETERS_ARTIFACT)

    @property
    def evaluation_run_id(self) -> str | None:
        """The run whose evaluation the version's ``eval.*`` tags hold (the training run when unrecorded)."""
        return self.tags.get(EVALUATION_RUN_TAG) or self.run_id

    @property
    def evaluated_separately(self) -> bool:
        """Whether a later ``kedro run`` than the training one evaluated this version."""
        return self.evaluation_run_id != self.run_id

    def evaluation_run(self) -> Any | None:
        """The MLflow run that evaluated the version, None when it cannot be read (noted in ``problems``)."""
        if not self.evaluated_separately:
            return self.run
        if not self._evaluation_run_read:  # read once: a failure is noted once, not at every access
            self._evaluation_run_read = True
            try:
                self._evaluation_run = self.client.get_run(self.evaluation_run_id)
            except Exception as error:  # noqa: BLE001
                self.problems.append(f"evaluation run {self.evaluation_run_id}: {_one_line(error)}")
        return self._evaluation_run

    @property
    def evaluation_metrics(self) -> dict[str, float]:
        run = self.evaluation_run()
        return dict(run.data.metrics) if run is not None else {}

    @property
    def evaluation_run_tags(self) -> dict[str, str]:
        run = self.evaluation_run()
        return dict(run.data.tags) if run is not None else {}

    def evaluation_parameters(self) -> dict[str, Any] | None:
        """``{"embed_tasks": …, "evaluate": …}`` as the evaluating run resolved them, None when not logged
        (runs from before evaluate logged them: only the training run's ``parameters`` exist there).
        Read once: a review shows them and ``--reproduce`` uses them."""
        if self._evaluation_parameters is _UNREAD:
            self._evaluation_parameters = None
            if self.evaluation_run_id is not None and self.evaluation_run() is not None:
                try:
                    listed = self.client.list_artifacts(self.evaluation_run_id, "config")
                except Exception as error:  # noqa: BLE001 - an unreachable artifact store: reported
                    self.problems.append(f"artifacts of run {self.evaluation_run_id}: {_one_line(error)}")
                    listed = []
                logged = {item.path for item in listed}
                if EVALUATION_PARAMETERS_ARTIFACT in logged:
                    self._evaluation_parameters = self._artifact_json(
                        self.evaluation_run_id, EVALUATION_PARAMETERS_ARTIFACT
                    )
        return self._evaluation_parameters

    def data_lineage(self) -> list[ProducingRun]:
        """The runs that saved the data the training run read, and the data those runs read, oldest first.

        Each ``input_version.<name>`` tag (the version's, else its run's) is the Kedro session that saved
        that version, found as the run of the training run's experiment tagged ``run_id = <version>``;
        its own ``input_version.*`` tags lead further up (episodes → preprocess → ingest). A version no
        run of this store was tagged with (saved through another store, or its run deleted) is noted in
        ``problems``. Read once.
        """
        if self._lineage is not None:
            return self._lineage
        self._lineage = []
        if self.run is None:
            return self._lineage
        from iris_pipelines.hooks import INPUT_VERSION_TAG_PREFIX as PREFIX

        def inputs(tags: dict[str, str]) -> list[tuple[str, str]]:
            return sorted(
                (key[len(PREFIX) :], value)
                for key, value in tags.items()
                if key.startswith(PREFIX) and value and value != "unversioned"
            )

        experiment = self.run.info.experiment_id
        own = {self.run_tags.get(SESSION_TAG)} - {None}
        pending = [(name, version, "the training run") for name, version in inputs(
            {**self.run_tags, **self.tags}
        )]  # fmt: skip
        producers: dict[str, ProducingRun] = {}
        by_version: dict[str, str | None] = {}
        while pending:
            name, version, reader = pending.pop(0)
            if version in own:  # saved by the training run itself (iris_model)
                continue
            if version not in by_version:
                if len(by_version) >= LINEAGE_LOOKUPS:
                    self.problems.append(f"data lineage: stopped after {LINEAGE_LOOKUPS} data versions")
                    break
                run, problem = self._session_run(experiment, name, version, reader)
                by_version[version] = None if run is None else run.info.run_id
                if problem:
                    self.problems.append(problem)
                if run is not None and run.info.run_id not in producers:
                    producers[run.info.run_id] = ProducingRun(run)
                    label = f"run {run.data.tags.get('mlflow.runName') or run.info.run_id}"
                    pending += [(n, v, label) for n, v in inputs(dict(run.data.tags))]
            producer = producers.get(by_version[version] or "")
            if producer is not None and (name, version) not in producer.saved:
                producer.saved.append((name, version))
        self._lineage = sorted(producers.values(), key=lambda p: p.run.info.start_time or 0)
        return self._lineage

    def _session_run(self, experiment: str, name: str, version: str, reader: str) -> tuple[Any, str | None]:
        """(the run of ``experiment`` tagged ``run_id = version``, or None; a note, or None)."""
        from mlflow.entities import ViewType

        what = f"{name} version {version} (read by {reader})"
        if "'" in version:
            return None, f"{what}: not a Kedro session id; the run that saved it is not looked up"
        try:
            runs = self.client.search_runs(
                [experiment],
                filter_string=f"tags.{SESSION_TAG} = '{version}'",
                run_view_type=ViewType.ALL,
                order_by=["attributes.start_time DESC"],
                max_results=10,
            )
        except Exception as error:  # noqa: BLE001 - a review shows what it can read
            return None, f"{what}: cannot search for the run that saved it: {_one_line(error)}"
        active = [run for run in runs if run.info.lifecycle_stage != "deleted"]
        if not active:
            where = f"experiment {experiment} of {self.tracking_uri}"
            if runs:
                return None, (
                    f"{what}: the run that saved it ({runs[0].info.run_id}) is deleted; the parameters it "
                    "was made with are not shown"
                )
            return None, (
                f"{what}: no run of {where} has tag {SESSION_TAG} = {version} (the Kedro session that "
                "saved it); the data came from another store, or its run was deleted, so the parameters "
                "it was made with are not shown"
            )
        if len(active) > 1:
            return active[0], (
                f"{what}: {len(active)} runs have tag {SESSION_TAG} = {version}; showing the newest, "
                f"{active[0].info.run_id}"
            )
        return active[0], None

    def download_bundle(self, destination: str | os.PathLike[str]) -> Path:
        """The version's bundle directory under ``destination``: the ``artifacts/bundle`` directory of its
        own logged pyfunc model, else (versions logged without one) its run's ``model_bundle`` artifact.

        The logged model comes first because it belongs to this version alone, while a run that
        registered twice (kedro-mlflow reusing a run) holds only the last ``model_bundle``.
        """
        tried = []
        if self.model_id:
            try:
                from mlflow.artifacts import download_artifacts

                location = self.client.get_logged_model(self.model_id).artifact_location
                return Path(
                    download_artifacts(
                        artifact_uri=f"{location.rstrip('/')}/{PYFUNC_BUNDLE}",
                        dst_path=str(destination),
                        tracking_uri=self.tracking_uri,
                    )
                )
            except Exception as error:  # noqa: BLE001
                tried.append(f"logged model {self.model_id} {PYFUNC_BUNDLE!r}: {_one_line(error)}")
        if self.run_id is not None:
            try:
                return Path(self.client.download_artifacts(self.run_id, BUNDLE_ARTIFACT, str(destination)))
            except Exception as error:  # noqa: BLE001
                tried.append(f"run {self.run_id} artifact {BUNDLE_ARTIFACT!r}: {_one_line(error)}")
        raise RegistryError(
            f"{self.uri}: no model bundle could be downloaded ({'; '.join(tried) or 'no run'})"
        )

    def bundle_location(self) -> str | None:
        """Where :meth:`download_bundle` would fetch the bundle from, found by listing its files (nothing is
        downloaded); None when neither place holds one, which is noted in ``problems`` (artifacts deleted
        by a clean-up of the store: `iris segment` and ``--reproduce`` cannot load the version)."""
        tried = []
        if self.model_id:
            where = f"logged model {self.model_id} {PYFUNC_BUNDLE!r}"
            try:
                from mlflow.artifacts import list_artifacts

                location = self.client.get_logged_model(self.model_id).artifact_location
                lacks = _lacks_bundle_files(
                    list_artifacts(
                        artifact_uri=f"{location.rstrip('/')}/{PYFUNC_BUNDLE}", tracking_uri=self.tracking_uri
                    )
                )
            except Exception as error:  # noqa: BLE001 - a review shows what it can read
                lacks = _one_line(error)
            if lacks is None:
                return where
            tried.append(f"{where}: {lacks}")
        if self.run_id is not None:
            where = f"run {self.run_id} artifact {BUNDLE_ARTIFACT!r}"
            try:
                lacks = _lacks_bundle_files(self.client.list_artifacts(self.run_id, BUNDLE_ARTIFACT))
            except Exception as error:  # noqa: BLE001
                lacks = _one_line(error)
            if lacks is None:
                return where
            tried.append(f"{where}: {lacks}")
        self.problems.append(
            f"{self.uri}: no model bundle found ({'; '.join(tried) or 'no logged model, no run'}); "
            "`iris segment` and --reproduce cannot load this version"
        )
        return None

    def load_bundle(self) -> ModelBundle:
        with tempfile.TemporaryDirectory(prefix="iris-bundle-") as scratch:
            directory = self.download_bundle(scratch)
            try:
                bundle = ModelBundle.load(directory)
            except BundleError as error:
                raise RegistryError(f"{self.uri}: the registered bundle is unusable: {error}") from error
        self._require_registered_weights(bundle)
        return bundle

    def _require_registered_weights(self, bundle: ModelBundle) -> None:
        """Hash the downloaded tensors and compare them with the version's ``weights_sha256`` tag and with
        the checksum the bundle's metadata records. The metadata alone proves nothing: a bundle re-saved
        with new weights and its old metadata would claim the registered checksum."""
        # Imported here: training's loop module (and its optimiser dependency) loads on first use only.
        from iris_pipelines.training import weights_checksum

        held = weights_checksum(bundle.state_dict)
        registered = self.tags.get("weights_sha256")
        if registered and held != registered:
            raise RegistryError(
                f"{self.uri} (version {self.version}): the downloaded bundle's tensors hash to {held}, but "
                f"the version was registered with weights_sha256 {registered}; its artifact was replaced "
                f"after registration. {_REPLACED_WEIGHTS_REMEDY}"
            )
        claimed = bundle.weights_checksum
        if claimed and held != claimed:
            raise RegistryError(
                f"{self.uri} (version {self.version}): the bundle's metadata records weights_checksum "
                f"{claimed}, but its tensors hash to {held}; the weights were changed without updating "
                f"config.json. {_REPLACED_WEIGHTS_REMEDY}"
            )


def _lacks_bundle_files(listed: list[Any]) -> str | None:
    """What an artifact listing lacks of a saved bundle (config and weights), None when it holds both."""
    names = {Path(item.path).name for item in listed}
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in names]
    if not names:
        return "no files"
    return f"no {' or '.join(missing)}" if missing else None


_REPLACED_WEIGHTS_REMEDY = (
    "Restore the original bundle, or register these weights as a new version (kedro run --pipelines=train) "
    "and use that"
)


def _logged_model_id(version: Any) -> str | None:
    """The logged model behind a version: ``model_id``, or (MLflow 3.17 leaves that empty for models
    logged with ``name=``) the id in its source URI ``models:/m-…``."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", str(getattr(version, "source", "") or ""))
    return match.group(1) if match else None


def _versions(client: Any, name: str) -> list[int]:
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def _what_exists(client: Any, name: str) -> str:
    """The versions and aliases of ``name`` (or the registered names, when ``name`` is none of them), for an
    error about one that does not exist; empty when the store cannot say."""
    try:
        registered = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - no such model (or the store stopped answering): try the names
        try:
            names = sorted(model.name for model in client.search_registered_models())
        except Exception:  # noqa: BLE001
            return ""
        return f"no registered model {name!r}; registered: {', '.join(names) or 'none'}"
    try:
        versions = _versions(client, name)
    except Exception:  # noqa: BLE001
        return ""
    aliases = sorted(dict(getattr(registered, "aliases", None) or {}).items())
    listed = f"versions of {name!r}: {', '.join(map(str, versions)) or 'none'}"
    return listed + (f"; aliases: {', '.join(f'@{a} = {v}' for a, v in aliases)}" if aliases else "")


def _read_run(client: Any, run_id: str | None) -> tuple[Any | None, str | None]:
    """(the run, None), or (None, why it cannot be read)."""
    if run_id is None:
        return None, "the version has no source run"
    try:
        return client.get_run(run_id), None
    except Exception as error:  # noqa: BLE001
        return None, f"run {run_id}: {_one_line(error)}"


def _run_state(run: Any) -> str | None:
    """How a run stands when it did not finish cleanly (ended FAILED or KILLED, still RUNNING, deleted);
    None for a FINISHED, active run."""
    info = getattr(run, "info", None)
    status = getattr(info, "status", "FINISHED")
    states = []
    if status != "FINISHED":
        states.append(f"ended {status}" if status in ("FAILED", "KILLED") else f"is {status}")
    if getattr(info, "lifecycle_stage", "active") == "deleted":
        states.append("is deleted")
    return f"its run {info.run_id} {' and '.join(states)}" if states else None


def _incomplete(version: Any, run: Any | None, problem: str | None) -> str | None:
    """Why ``version`` is not a complete registration, or None; ``run`` and ``problem`` are what
    :func:`_read_run` made of its run.

    register_model creates a version with all its tags in one request, as train's last node: one with
    them, that MLflow finished registering (READY) and whose run is not deleted, holds the whole model.
    How its run ended does not count: the run covers the rest of the `kedro run` (embed_tasks, evaluate,
    tsne), and one of those failing says nothing about the model.
    """
    missing = [key for key in REQUIRED_VERSION_TAGS if not (version.tags or {}).get(key)]
    deleted = run is not None and run.info.lifecycle_stage == "deleted"
    reasons = [
        problem,
        f"its run {version.run_id} is deleted" if deleted else None,
        f"its registration is {version.status}, not READY" if version.status != "READY" else None,
        f"no {', '.join(missing)} tag{'s' if len(missing) > 1 else ''}" if missing else None,
    ]
    found = [reason for reason in reasons if reason]
    return "; ".join(found) if found else None


def _run_note(number: str, run: Any, complete: bool) -> str | None:
    """What a version's run that did not finish cleanly means for it (None for a FINISHED, active run)."""
    state = _run_state(run)
    if state is None:
        return None
    if complete:
        return (
            f"version {number}: {state} after registering it; the model is complete (registered with its "
            "tags), but what that run recorded later (evaluation, t-SNE) may be missing"
        )
    return f"version {number}: {state}; what it recorded (tags, metrics, artifacts) may be incomplete"


def _latest_complete(client: Any, uri: str, name: str, numbers: list[int]) -> tuple[Any, Any, list[str]]:
    """The highest version that is a complete registration (provenance tags, READY, run not deleted),
    its run, and a note per newer version passed over; a RegistryError when there is none."""
    skipped = []
    for number in reversed(numbers):
        version = client.get_model_version(name, str(number))
        run, problem = _read_run(client, version.run_id or None)
        reason = _incomplete(version, run, problem)
        if reason is None:
            return version, run, skipped
        skipped.append(f"version {number} ({reason})")
    raise RegistryError(
        f"{uri}: no complete version of {name!r} (registered with its provenance tags, its run not "
        f"deleted): {'; '.join(skipped)}; name a version (models:/{name}/<n>) to use one anyway"
    )


def resolve(uri: str, tracking: str) -> RegisteredModel:
    """``models:/<name>/<version>``, ``models:/<name>/latest`` or ``models:/<name>@<alias>`` → the version,
    its tags and its run.

    ``latest`` is the highest complete version: one registered with its provenance tags (READY) whose run
    is not deleted, however that run ended; newer versions passed over are named in ``problems``. A
    version named by number or alias is used as it is. Either way a run that did not finish cleanly is
    noted, with what that means for the version."""
    match = _MODEL_URI.match(uri)
    if match is None:
        raise RegistryError(
            f"{uri}: not a registry URI; expected models:/<name>/<version>, models:/<name>/latest or "
            "models:/<name>@<alias>"
        )
    client = _client(tracking)
    name = match["name"]
    latest_run, skipped = None, []
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"])
        elif match["version"] == "latest":
            numbers = _versions(client, name)
            if not numbers:
                raise RegistryError(f"{uri}: {_what_exists(client, name) or f'{name!r} has no version'}")
            version, latest_run, skipped = _latest_complete(client, uri, name, numbers)
        else:
            version = client.get_model_version(name, match["version"])
    except RegistryError:
        raise
    except Exception as error:  # noqa: BLE001 - MlflowException, connection errors, …
        known = _what_exists(client, name) if getattr(error, "error_code", None) in _NOT_FOUND_CODES else ""
        raise RegistryError(
            f"{uri}: cannot read the model version from {tracking}: {_one_line(error)}"
            + (f" ({known})" if known else "")
        ) from None
    record = RegisteredModel(
        uri=uri,
        name=name,
        version=str(version.version),
        tracking_uri=tracking,
        tags=dict(version.tags or {}),
        run_id=version.run_id or None,
        run=None,
        model_id=_logged_model_id(version),
        client=client,
    )
    if skipped:
        record.problems.append(
            f"{uri} is version {record.version}, the newest complete registration; passed over: "
            f"{'; '.join(skipped)}"
        )
    if latest_run is not None:
        record.run, problem, complete = latest_run, None, True
    else:
        record.run, problem = _read_run(client, record.run_id)
        complete = _incomplete(version, record.run, problem) is None
    if problem:
        record.problems.append(problem)
    elif (note := _run_note(record.version, record.run, complete)) is not None:
        record.problems.append(note)
    return record


@dataclass
class LoadedModel:
    """A model for ``iris segment``: its bundle, its registry version (None for a local bundle) and the
    bundle directory a local ``--model`` resolved to."""

    uri: str
    bundle: ModelBundle
    record: RegisteredModel | None
    path: Path | None = None

    def source(self) -> dict[str, Any]:
        """What ``--model`` resolved to, as the segmentation sidecar records it."""
        registry = self.record
        return {
            "model_registry": None
            if registry is None
            else {"name": registry.name, "version": registry.version, "run_id": registry.run_id},
            "model_path": None if self.path is None else str(self.path),
        }

    def describe(self) -> str:
        """``--model`` as given, with what it resolved to when that is not spelled out in it."""
        if self.record is not None and self.record.uri != f"models:/{self.record.name}/{self.record.version}":
            return f"{self.uri} = version {self.record.version} of {self.record.name}"
        if self.path is not None and self.path != Path(self.uri):
            return f"{self.uri} → version {self.path.parent.name}"
        return self.uri


def load_model_bundle(model: str, tracking: str) -> LoadedModel:
    """A registry URI, a local bundle directory or a versioned catalog folder of bundles → the bundle."""
    if is_registry_uri(model):
        record = resolve(model, tracking)
        return LoadedModel(model, record.load_bundle(), record)
    directory = bundle_directory(model)
    return LoadedModel(model, ModelBundle.load(directory), None, directory)
