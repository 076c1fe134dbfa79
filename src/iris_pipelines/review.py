"""``iris review``: which code, data and config made a registered model, and do its numbers reproduce?

:func:`provenance` gathers what ``register_model`` (train) and ``report_evaluation`` (evaluate) recorded
on a model version and its runs into titled sections, naming what is missing instead of failing.
:func:`reproduce` re-runs ``embed_tasks`` and ``evaluate`` (the very node functions) as the run that
evaluated the version did (the training run, or a later evaluate-only run named by the version's
``evaluation_run_id``): on the ``episode_index`` / ``preprocessed_manifest`` versions that run read,
loaded through the project's own catalog configuration, with that run's settings, and compares every
number it recorded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iris_pipelines.hooks import INPUT_VERSION_TAG_PREFIX, LOCK_FILE, file_sha256
from iris_pipelines.registry import (
    EVAL_TAG_DECIMALS,
    EVAL_TAG_PREFIX,
    EVALUATION_DEVICE_TAG,
    PARAMETERS_ARTIFACT,
    SESSION_TAG,
    ProducingRun,
    RegisteredModel,
)

INPUTS = ("episode_index", "preprocessed_manifest")
CHECKSUM_TAGS = ("episode_index_checksum", "preprocessed_manifest_checksum")
EVAL_METRIC_PREFIX = "eval/"  # ... and logs eval/<group>/<method>/<metric> to its run
MISSING = "(not recorded)"
# The sections train's nodes read (params:model, params:train, params:preprocess; see
# pipelines/train/pipeline.py), and those a run that also evaluated read.
TRAIN_SECTIONS = ("model", "preprocess", "train")
EVALUATION_SECTIONS = ("embed_tasks", "evaluate")
# kedro-mlflow logs register_model's ``parameters`` input (the whole configuration) as parameters.<…>
WHOLE_CONFIG_PARAM = "parameters."

Section = tuple[str, list[tuple[str, str]]]


def _flatten(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def lock_status(recorded: str | None, project_dir: Path) -> str:
    """Whether the recorded lock-file hash matches the project's current ``requirements.lock``."""
    lock = project_dir / LOCK_FILE
    if not recorded or recorded == "missing":
        return "no lock file was recorded"
    if not lock.is_file():
        return f"{lock} not found; cannot compare"
    return "matches current" if file_sha256(lock) == recorded else f"differs from current {lock}"


def _final_metric(record: RegisteredModel, key: str) -> str:
    history = sorted(record.metric_history(key), key=lambda m: (m.step, m.timestamp))
    if history:
        return f"{history[-1].value:.6g} (step {history[-1].step})"
    if key in record.metrics:
        return _fmt(record.metrics[key])
    return MISSING


def provenance(
    record: RegisteredModel, project_dir: Path, parameters: Mapping[str, Any] | None
) -> list[Section]:
    """Titled (key, value) sections: model, code and environment, data, training, evaluation, the
    parameters the training run read, and those of each run that saved the data it read."""
    tags, run_tags = record.tags, record.run_tags

    def tag(key: str) -> str:
        return tags.get(key) or run_tags.get(key) or MISSING

    run_info = getattr(record.run, "info", None)
    model = [
        ("model URI", record.uri),
        ("run id", record.run_id or MISSING),
        ("run name", run_tags.get("mlflow.runName", MISSING)),
        # A FAILED, KILLED or deleted run's version may lack what a completed registration records.
        ("run status", getattr(run_info, "status", None) or MISSING),
        ("run lifecycle stage", getattr(run_info, "lifecycle_stage", None) or MISSING),
        ("weights sha256", tags.get("weights_sha256") or MISSING),
        # the artifacts may be gone (a store's clean-up) while the version and its run remain
        ("model bundle", record.bundle_location() or "not found (see the note below)"),
        ("tracking URI", record.tracking_uri),
    ]
    code = [
        ("git commit", tag("git_commit")),
        ("git dirty", tag("git_dirty")),
        ("lock file sha256", tag("lockfile_sha256")),
        ("installed from lock sha256", tag("installed_lock_sha256")),
        (
            "lock file",
            lock_status(tags.get("lockfile_sha256") or run_tags.get("lockfile_sha256"), project_dir),
        ),
        ("kedro env", tag("kedro_env")),
        # kedro-mlflow rebuilds the command from the pipelines and nodes run: no --env, no --params
        ("kedro command (without env, params)", run_tags.get("kedro_command", MISSING)),
    ]
    data = [(f"version of {name}", tag(f"{INPUT_VERSION_TAG_PREFIX}{name}")) for name in INPUTS]
    others = [f"{INPUT_VERSION_TAG_PREFIX}{name}" for name in INPUTS]
    data += [
        (key, value)
        for key, value in sorted(tags.items())
        if key.startswith(INPUT_VERSION_TAG_PREFIX) and key not in others
    ]
    data += [(key, tag(key)) for key in CHECKSUM_TAGS]
    training = [
        ("final step", tag("final_step")),
        ("world size", tag("world_size")),
        ("final train/loss", _final_metric(record, "train/loss")),
    ]
    training += [
        (key, _final_metric(record, key)) for key in sorted(record.metrics) if key.startswith("val/dice/")
    ]
    training += [(key, value) for key, value in sorted(tags.items()) if key.startswith("val_dice.")]
    evaluation = [(key, value) for key, value in sorted(tags.items()) if key.startswith(EVAL_TAG_PREFIX)]
    evaluation += [
        (f"run {key}", _fmt(value))
        for key, value in sorted(record.evaluation_metrics.items())
        if key.startswith(EVAL_METRIC_PREFIX)
    ]
    if not evaluation:
        evaluation = [("evaluation", "none recorded: run `kedro run --pipelines=embed_tasks,evaluate`")]
    elif record.evaluated_separately:
        evaluated_on = record.evaluation_run_tags
        evaluation = [
            ("evaluation run id", record.evaluation_run_id or MISSING),
            *[
                (f"evaluated {name} version", evaluated_on.get(f"{INPUT_VERSION_TAG_PREFIX}{name}", MISSING))
                for name in INPUTS
            ],
            *evaluation,
        ]
    if record.evaluated_separately:
        settings = record.evaluation_parameters() or {}
        evaluation += [(f"evaluation settings: {key}", _fmt(value)) for key, value in _flatten(settings)]
    return [
        (f"model {record.name} version {record.version}", model),
        ("code and environment", code),
        ("data", data),
        ("training", training),
        ("evaluation", evaluation),
        training_parameters(record, parameters),
        *[producer_parameters(producer) for producer in record.data_lineage()],
    ]


def sections_read(record: RegisteredModel) -> list[str]:
    """The parameter sections the training run's nodes read: train's, evaluate's when that run evaluated,
    and any other its kedro-mlflow params show it read (``<section>.<key>``; ``parameters.*`` is the whole
    configuration register_model logs, not a section it read)."""
    read = set(TRAIN_SECTIONS)
    if any(key.startswith(EVAL_METRIC_PREFIX) for key in record.metrics):
        read.update(EVALUATION_SECTIONS)
    read.update(key.split(".", 1)[0] for key in record.params if not key.startswith(WHOLE_CONFIG_PARAM))
    return sorted(read)


def _run_params(run_params: Mapping[str, str]) -> list[tuple[str, str]]:
    """A run's logged params, less the whole configuration register_model logs as ``parameters.*``."""
    own = {key: value for key, value in run_params.items() if not key.startswith(WHOLE_CONFIG_PARAM)}
    return sorted(own.items())


def training_parameters(record: RegisteredModel, parameters: Mapping[str, Any] | None) -> Section:
    """The sections of ``config/parameters.json`` the training run read. The rest of that file is the
    configuration as it stood when training ran, not what made its data: :func:`producer_parameters`
    shows that, from the runs that saved the data."""
    run = record.run_tags.get("mlflow.runName") or record.run_id or MISSING
    if parameters is None:
        rows = _run_params(record.params) or [("parameters", MISSING)]
        return f"parameters of the training run {run} (its run params; {PARAMETERS_ARTIFACT} {MISSING})", rows
    read = sections_read(record)
    rows = [(key, _fmt(value)) for key, value in _flatten({k: v for k, v in parameters.items() if k in read})]
    others = sorted(key for key in parameters if key not in read)
    if others:
        rows.append(
            (
                "not read by this run",
                f"{', '.join(others)}: {PARAMETERS_ARTIFACT} holds them as configured when training ran; "
                "the values that made its data are those of the runs that saved it",
            )
        )
    shown = ", ".join(key for key in read if key in parameters)
    return f"parameters of the training run {run} ({PARAMETERS_ARTIFACT}: {shown or 'none'})", rows


def _runtime_params(tag: str | None) -> list[tuple[str, str]]:
    """kedro-mlflow's ``runtime_params`` tag (the ``--params`` of `kedro run`, a Python dict's repr) as
    ``--params <key>`` rows."""
    import ast

    if not tag:
        return [("--params", "none")]
    try:
        overrides = ast.literal_eval(tag)
    except (ValueError, SyntaxError):
        return [("--params", tag)]
    if not isinstance(overrides, Mapping):
        return [("--params", tag)]
    return [(f"--params {key}", _fmt(value)) for key, value in _flatten(overrides)] or [("--params", "none")]


def producer_parameters(producer: ProducingRun) -> Section:
    """What one run that saved the model's data (ingest, preprocess, episodes) ran with: its ``--params``
    (kedro-mlflow's ``runtime_params`` tag) and the params its nodes read, as it logged them."""
    tags = dict(producer.run.data.tags)
    name = tags.get("mlflow.runName") or "?"
    rows = [
        *[(f"saved {dataset}", f"version {version}") for dataset, version in producer.saved],
        ("run id", producer.run.info.run_id),
        ("run status", producer.run.info.status),
        ("kedro session", tags.get(SESSION_TAG, MISSING)),
        ("kedro command (without env, params)", tags.get("kedro_command", MISSING)),
        ("kedro env", tags.get("kedro_env") or tags.get("env") or MISSING),
        *_runtime_params(tags.get("runtime_params")),
        *(_run_params(producer.run.data.params) or [("parameters", "none logged")]),
    ]
    return f"parameters of run {name} (saved {', '.join(dataset for dataset, _ in producer.saved)})", rows


# ---------------------------------------------------------------------------------------------- reproduce


@dataclass(frozen=True)
class Comparison:
    """One recorded number against its recomputation."""

    metric: str
    recorded: float
    reproduced: float | None
    tolerance: float

    @property
    def difference(self) -> float:
        return math.inf if self.reproduced is None else abs(self.recorded - self.reproduced)

    @property
    def ok(self) -> bool:
        return self.difference <= self.tolerance


@dataclass
class Reproduction:
    """The comparisons, plus errors (which make it fail) and notes (warnings that do not)."""

    comparisons: list[Comparison] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.comparisons) and all(c.ok for c in self.comparisons)


def recorded_evaluation(record: RegisteredModel) -> dict[str, float]:
    """``eval/<group>/<method>/<metric>`` → value, from the version's tags and the evaluation run's metrics.

    Tags (``eval.seen.one_shot.dice``) are what the newest evaluate run put on the version; that run (the
    training run, or a later ``kedro run --pipelines=embed_tasks,evaluate``) logged the ``eval/…`` metrics.
    Tag values are rounded to ``EVAL_TAG_DECIMALS`` decimals; :func:`reproduced_value` rounds the
    recomputation alike.
    """
    recorded: dict[str, float] = {}
    for key, value in record.tags.items():
        if key.startswith(EVAL_TAG_PREFIX):
            try:
                recorded[f"tag {key}"] = float(value)
            except ValueError:
                recorded[f"tag {key}"] = math.nan  # a non-number never matches: reported, not skipped
    for key, value in record.evaluation_metrics.items():
        if key.startswith(EVAL_METRIC_PREFIX):
            recorded[f"metric {key}"] = float(value)
    return recorded


def _headline_key(name: str) -> str:
    kind, key = name.split(" ", 1)
    return key.replace(".", "/") if kind == "tag" else key


def reproduced_value(name: str, headline: Mapping[str, float]) -> float | None:
    """The recomputed number for the recorded one ``name``, at the recorded precision.

    A tag holds its value written with ``EVAL_TAG_DECIMALS`` decimals, so the recomputation is written the
    same way before comparing: otherwise a bit-exact reproduction differs by up to half the last decimal
    and fails any ``--tolerance`` below it.
    """
    value = headline.get(_headline_key(name))
    if value is None or not name.startswith("tag "):
        return value
    return float(f"{value:.{EVAL_TAG_DECIMALS}f}")


def _anchored(path: str, base: Path) -> str:
    """A relative local path joined to ``base``; absolute paths and URLs (``s3://…``) are left as they are."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(base / path)


def project_config(project_dir: Path, env: str | None, data_root: str | None) -> Any:
    """The project's OmegaConfigLoader (settings.py arguments), with ``globals.data_root`` overridden.

    A relative override is taken from the current directory, as any path typed on a command line.
    """
    from kedro.config import OmegaConfigLoader

    from iris_pipelines.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(project_dir / "conf"), env=env, **CONFIG_LOADER_ARGS)
    if data_root is not None:
        loader["globals"] = {**loader["globals"], "data_root": _anchored(str(data_root), Path.cwd())}
    return loader


def read_project_config(project_dir: Path, env: str | None, data_root: str | None) -> tuple[dict, dict]:
    """The project's catalog and parameters; a missing ``conf/`` or env folder is a ``ValueError``."""
    from kedro.config import MissingConfigException

    try:
        loader = project_config(project_dir, env, data_root)
        return loader["catalog"], loader["parameters"]
    except (MissingConfigException, OSError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(
            f"cannot read the Kedro configuration of --project {project_dir} (env {env or 'local'}): "
            f"{reason}; pass --project <the Kedro project> and an --env it has under conf/"
        ) from None


def _available_here(device: str) -> bool:
    """Whether this machine has ``device`` (``cuda:1`` needs two GPUs)."""
    from iris_pipelines.inference.device import resolve_device

    try:
        resolve_device(device)
    except ValueError:
        return False
    return True


def _reproduce_on_this_machine(params: dict[str, Any], record: RegisteredModel) -> list[str]:
    """Run embed_tasks and evaluate where this machine can, and say when that is not where the recorded
    evaluation ran: a GPU's numbers differ from a CPU's in the last bits, beyond a tight --tolerance.

    The embed_tasks device is the one stored in the task_embeddings the evaluation read (resolved: cuda:0,
    not auto); tables written before it was stored name none, and are re-embedded on the CPU.
    """
    import torch

    from iris_pipelines.inference.device import resolve_device

    embedded_on = params["embed_tasks"].get("device")
    notes = []
    for section in ("embed_tasks", "evaluate"):
        wanted = str(params[section].get("device", "cpu"))
        if wanted.startswith("cuda") and not _available_here(wanted):
            params[section] = {**params[section], "device": "cpu"}
            notes.append(
                f"params:{section} asked for {wanted}, which this machine lacks: reproducing on the CPU"
            )
    tags = record.evaluation_run_tags if record.evaluated_separately else record.run_tags
    recorded = tags.get(EVALUATION_DEVICE_TAG)
    embed_here = resolve_device(str(params["embed_tasks"].get("device", "cpu")))
    if embedded_on is None:
        if recorded and torch.device(recorded).type != embed_here.type:
            notes.append(
                f"the task embeddings do not record the device they were made on (written before it was "
                f"stored) and are re-made on {embed_here}, while the evaluation ran on {recorded}: if "
                "embed_tasks ran there too, expect differences in the last bits"
            )
    elif str(embedded_on) != "auto" and torch.device(str(embedded_on)).type != embed_here.type:
        notes.append(
            f"the task embeddings were made on {embedded_on} and are re-made on {embed_here}: expect "
            "differences in the last bits; judge them with a looser --tolerance"
        )
    here = resolve_device(str(params["evaluate"].get("device", "cpu")))
    if recorded and torch.device(recorded).type != here.type:
        notes.append(
            f"the evaluation ran on {recorded} and is reproduced on {here}: expect differences in the last "
            "bits; judge them with a looser --tolerance"
        )
    return notes


def evaluated_inputs(record: RegisteredModel) -> tuple[dict[str, str], str]:
    """Tags naming the data versions (and checksums) the recorded evaluation ran on, and their source.

    Those of the evaluation run when evaluate ran apart from training (it may have read newer versions),
    else those register_model put on the version.
    """
    if record.evaluated_separately:
        return record.evaluation_run_tags, f"evaluation run {record.evaluation_run_id}"
    return record.tags, record.uri


def load_recorded_inputs(
    tags: Mapping[str, str], source: str, catalog_config: Mapping[str, Any], project_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    """``episode_index`` and ``preprocessed_manifest`` at the versions ``tags`` (recorded on ``source``) name.

    Relative catalog filepaths (base ``data_root`` is ``data``) are the project's, as under ``kedro run``
    in the project root, so they are resolved against ``project_dir``, not the current directory.
    """
    from kedro.io import DataCatalog

    loaded, errors = {}, []
    for name in INPUTS:
        version = tags.get(f"{INPUT_VERSION_TAG_PREFIX}{name}")
        if not version or version == "unversioned":
            errors.append(
                f"{name}: no data version was recorded on {source} (tag {INPUT_VERSION_TAG_PREFIX}{name})"
            )
            continue
        if name not in catalog_config:
            errors.append(f"{name}: the project's catalog has no entry for it")
            continue
        entry = dict(catalog_config[name])
        if "filepath" in entry:
            entry["filepath"] = _anchored(str(entry["filepath"]), project_dir)
        try:
            catalog = DataCatalog.from_config({name: entry}, load_versions={name: version})
            loaded[name] = catalog.load(name)
        except Exception as error:  # noqa: BLE001 - DatasetError, VersionNotFoundError, OSError, …
            where = entry.get("filepath", "?")
            reason = " ".join(str(error).split())[:300]
            errors.append(f"{name}: cannot load recorded version {version} from {where}: {reason}")
    return loaded, errors


def checksum_mismatches(tags: Mapping[str, str], index: Mapping[str, Any], manifest: Any) -> list[str]:
    """The loaded inputs against the checksums ``tags`` recorded (a re-written version fails)."""
    from iris_pipelines.pipelines.train.nodes import input_checksums

    actual = input_checksums(index, manifest)
    return [
        f"{key[: -len('_checksum')]}: the loaded version has checksum {value[:12]}…, "
        f"but {tags[key][:12]}… was recorded"
        for key, value in actual.items()
        if tags.get(key) and tags[key] != value
    ]


def reproduce(
    record: RegisteredModel,
    *,
    project_dir: Path,
    env: str | None = None,
    data_root: str | None = None,
    tolerance: float = 1e-6,
    parameters: Mapping[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Reproduction:
    """Re-run embed_tasks + evaluate as the recorded evaluation did and compare every number it recorded.

    ``parameters`` are the training run's; the evaluation's own settings win when its run logged them.
    """
    from iris_pipelines.evaluation.report import gain_over_baseline, headline_metrics, summary_by_group
    from iris_pipelines.pipelines.embed_tasks.nodes import embed_tasks
    from iris_pipelines.pipelines.evaluate.nodes import evaluate_strategies

    step = on_step or (lambda _: None)
    result = Reproduction()
    recorded = recorded_evaluation(record)
    if not recorded:
        result.errors.append(f"{record.uri} has no recorded evaluation (no eval.* tags or eval/* metrics)")
        return result
    step("loading recorded data versions")
    catalog_config, project_params = read_project_config(project_dir, env, data_root)
    tags, source = evaluated_inputs(record)
    inputs, errors = load_recorded_inputs(tags, source, catalog_config, project_dir)
    result.errors.extend(errors)
    params = record.evaluation_parameters()
    if params is None and not record.evaluated_separately:
        params = parameters
    params = dict(params or {})
    for section in ("embed_tasks", "evaluate"):
        if section not in params:
            params[section] = project_params.get(section, {})
            result.notes.append(
                f"params:{section} was not recorded by {source}; using the project's current values"
            )
    if not any(tags.get(key) for key in CHECKSUM_TAGS):
        result.notes.append(f"{source} recorded no input checksums; the loaded versions are not verified")
    result.notes.extend(_reproduce_on_this_machine(params, record))
    if result.errors:
        return result
    step("loading the registered model")
    bundle = record.load_bundle()
    registered = {
        "name": record.name,
        "version": record.version,
        "model_uri": f"models:/{record.name}/{record.version}",
        "run_id": record.run_id,
    }
    index, manifest = inputs["episode_index"], inputs["preprocessed_manifest"]
    result.errors.extend(checksum_mismatches(tags, index, manifest))
    if result.errors:
        return result
    step("embedding tasks")
    embeddings = embed_tasks(bundle, registered, index, manifest, params["embed_tasks"])
    step("evaluating")
    metrics = evaluate_strategies(bundle, registered, embeddings, index, manifest, params["evaluate"])
    headline = headline_metrics(summary_by_group(metrics), gain_over_baseline(metrics))
    for name, value in sorted(recorded.items()):
        result.comparisons.append(Comparison(name, value, reproduced_value(name, headline), tolerance))
    return result


def default_env(record: RegisteredModel, project_dir: Path) -> str | None:
    """The recorded Kedro env when the project has that conf folder (data roots differ per env)."""
    env = record.tags.get("kedro_env") or record.run_tags.get("kedro_env")
    if env and env not in ("base", "local", "unknown") and (project_dir / "conf" / env).is_dir():
        return env
    return None
