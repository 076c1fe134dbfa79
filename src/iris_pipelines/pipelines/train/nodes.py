"""Train nodes: hand the episode index to a launcher, keep the bundle, and register it with provenance.

The train loop itself lives in ``iris_pipelines.training`` and where it runs in ``iris_pipelines.launch``
(DESIGN.md layout); these nodes only translate catalog data and parameters, stream metrics to the
MLflow run that kedro-mlflow opened, and make the registry entry answer "which code, data and config made
this model" (DESIGN.md, "Model artifacts").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from iris_pipelines.collection.episodes import index_checksum
from iris_pipelines.hooks import INPUT_VERSION_TAG_PREFIX, LOCK_FILE, provenance_tags
from iris_pipelines.inference.bundle import PREPROCESS_KEYS, ModelBundle
from iris_pipelines.inference.pyfunc_model import MODEL_CONFIG, SIGNATURE
from iris_pipelines.registry import BUNDLE_ARTIFACT
from iris_pipelines.training.checkpoint import SCHEDULING_KEYS

logger = logging.getLogger(__name__)

# Keys of params:train that steer the node, not the train loop (TrainConfig rejects unknown keys).
NODE_KEYS = ("launcher", "launcher_options", "checkpoint_root", "registry_name")
PROVENANCE_KEYS = ("git_commit", "git_dirty", "lockfile_sha256", "installed_lock_sha256", "kedro_env")
PACKAGE_DIR = Path(__file__).resolve().parents[2]
PYFUNC_SOURCE = PACKAGE_DIR / "inference" / "pyfunc_model.py"


def build_model_config(params_model: dict[str, Any]) -> dict[str, Any]:
    """``{size: cpu|tiny|paper, **overrides}`` → a full, validated ``IrisConfig`` dict."""
    from iris_pipelines.model import IrisConfig

    overrides = dict(params_model)
    size = overrides.pop("size", "tiny")
    factories = {"cpu": IrisConfig.cpu, "tiny": IrisConfig.tiny, "paper": IrisConfig.paper}
    if size not in factories:
        raise ValueError(f"params:model.size must be one of {sorted(factories)}, got {size!r}")
    # from_dict names unknown fields (a typo in params:model) instead of a bare TypeError.
    return IrisConfig.from_dict({**factories[size]().to_dict(), **overrides}).to_dict()


def recorded_preprocessing(
    params_preprocess: Mapping[str, Any] | None, preprocessed_manifest: pd.DataFrame
) -> dict[str, Any]:
    """The preprocessing settings to record with the model, checked against the volumes it trains on.

    A manifest loaded at an older version (``--load-versions``) can hold volumes preprocessed at another
    spacing than ``params:preprocess`` says; the bundle would then record the wrong one, so that fails.
    """
    from iris_pipelines.imaging.geometry import Geometry

    given = dict(params_preprocess or {})
    recorded = {key: given[key] for key in PREPROCESS_KEYS if key in given}
    if "target_spacing" not in recorded:
        return recorded
    spacing = recorded["target_spacing"]
    spacing = [float(v) for v in (spacing if isinstance(spacing, list | tuple) else [spacing] * 3)]
    recorded["target_spacing"] = spacing
    if "preprocessed_geometry" in preprocessed_manifest:
        found = {Geometry.from_json(text).spacing for text in preprocessed_manifest["preprocessed_geometry"]}
        other = sorted(
            s for s in found if not all(math.isclose(a, b) for a, b in zip(s, spacing, strict=True))
        )
        if other:
            raise ValueError(
                f"params:preprocess.target_spacing is {spacing} mm but the preprocessed_manifest holds "
                f"volumes at {[list(s) for s in other]} mm (a manifest of another preprocess run?): rerun "
                "`kedro run --pipelines=preprocess` or set params:preprocess to what made these volumes"
            )
    return recorded


def train_subjects(episode_index: Mapping[str, Any]) -> list[str]:
    """``dataset/subject_id`` of every subject of the index's train split, sorted."""
    cases = episode_index.get("cases", [])
    return sorted({f"{case['dataset']}/{case['subject_id']}" for case in cases if case["split"] == "train"})


def class_names(episode_index: Mapping[str, Any], class_ids: Mapping[str, int]) -> dict[str, str]:
    """``"dataset/label"`` → name, from the index's class tables, for every memory-bank class: ``iris
    segment --strategy memory_bank`` names its classes from the bundle alone."""
    tables = episode_index.get("classes", {})
    names = {}
    for key in class_ids:
        dataset, label = key.split("/", 1)
        name = tables.get(dataset, {}).get(label, {}).get("name")
        if name is not None:
            names[key] = str(name)
    return names


def split_train_params(params_train: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(node options, TrainConfig dict): the launcher and paths stay out of the train loop's config."""
    node = {key: params_train[key] for key in NODE_KEYS if key in params_train}
    train = {key: value for key, value in params_train.items() if key not in NODE_KEYS}
    return node, train


def parameter_layout(model_config: dict) -> str:
    """SHA-256 of the names and shapes of the network's tensors for ``model_config``.

    Built on the meta device (no memory, no init), so it is cheap even for the paper network. It changes
    when the code changes the network, not only when the config does.
    """
    import torch

    from iris_pipelines.model import Iris, IrisConfig

    with torch.device("meta"):
        model = Iris(IrisConfig.from_dict(model_config))
    layout = sorted((name, list(tensor.shape)) for name, tensor in model.state_dict().items())
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def checkpoint_dir(
    root: str | Path,
    model_config: dict,
    train_config: dict,
    episode_checksum: str,
    layout: str = "",
    volumes: str = "",
) -> Path:
    """Checkpoints keyed by what determines the run, so re-running the same recipe resumes, a new one
    (or a network whose ``layout`` changed with the code) starts afresh and leaves the old ones alone.
    The train config is keyed as ``TrainConfig`` reads it, so one recipe written another way (a default
    spelled out, ``crop_size: 32`` for a cube, ``steps: 8e4``) is the same folder. ``SCHEDULING_KEYS`` are
    left out: they change no weight. The number of ranks is not in the key, but in each checkpoint, and a
    resume on another number is refused (``training.loop``).

    ``volumes`` identifies the preprocessed arrays (:func:`manifest_checksum`): the episode index names
    cases, not intensities, so without it a change of normalisation or spacing would resume a network
    trained on the old volumes.
    """
    from iris_pipelines.training import TrainConfig

    root = Path(root)
    recipe = TrainConfig.from_dict(train_config).to_dict()
    folder = root / _recipe_key(model_config, recipe, episode_checksum, layout, volumes)
    # Folders written before the key was normalised hash the params as written; a rerun of that same
    # spelling keeps resuming there instead of training again from step 0.
    legacy = root / _recipe_key(model_config, train_config, episode_checksum, layout, volumes)
    if not folder.exists() and legacy.exists():
        logger.info("Resuming checkpoints in %s, keyed by the train params as written", legacy)
        return legacy
    return folder


def _recipe_key(
    model_config: dict, train_config: dict, episode_checksum: str, layout: str, volumes: str
) -> str:
    key = json.dumps(
        {
            "model": model_config,
            "train": {key: value for key, value in train_config.items() if key not in SCHEDULING_KEYS},
            "episodes": episode_checksum,
            "layout": layout,
            "volumes": volumes,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def mlflow_name(dataset: str) -> str:
    """A dataset name as one part of an MLflow metric or tag key, which allows only letters, digits and
    ``_-. ``: ``liver (CT)`` → ``liver _CT_``. Ingest accepts any name, and MLflow's refusal would stop
    training at its first validation."""
    part = re.sub(r"[^\w.\- ]", "_", str(dataset))
    return part if part.strip(".") else f"_{part}"  # "." or ".." would read as a path


def metric_record(metrics: dict[str, Any]) -> tuple[dict[str, float], int | None]:
    """One launcher metrics dict → MLflow metric names and the step.

    Train records (loss, dice_loss, ce_loss, exclusive_loss when that term is on, lr, samples_per_s)
    become ``train/<key>``; a validation record ``{step, dataset, dice}`` becomes ``val/dice/<dataset>``;
    keys already holding a ``/`` are kept.
    """
    step = metrics.get("step")
    step = int(step) if step is not None else None
    if "dataset" in metrics and "dice" in metrics:
        values = {f"val/dice/{mlflow_name(metrics['dataset'])}": metrics["dice"]}
    else:
        values = {
            key if "/" in key else f"train/{key}": value for key, value in metrics.items() if key != "step"
        }
    numeric = {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    }
    return numeric, step


class MlflowMetricStream:
    """The launcher's ``on_metrics``: logs each metrics dict as it arrives, when an MLflow run is active.

    A run resumed from a checkpoint streams only the steps after it; :meth:`replay` then logs the
    restored records the stream never saw, so every MLflow run shows the whole curve. A launcher may also
    send ``{"tags": {...}}`` (the SLURM launcher: job id, job folder, world size), set as run tags.

    Best effort while training runs: a tracking server that is briefly unreachable must not stop days of
    training (or, under SLURM, leave the job running with nobody watching it). A record MLflow did not
    take is warned about and sent again by :meth:`replay` when training ends.
    """

    def __init__(self) -> None:
        self.seen: set[tuple[str, ...]] = set()
        self.unsent_tags: dict[str, str] = {}
        self.failures = 0

    def _send(self, call: Callable[[], Any]) -> bool:
        """Whether MLflow took it (or there is no run to send it to)."""
        if mlflow.active_run() is None:
            return True
        try:
            call()
        except Exception as error:  # noqa: BLE001 - MlflowException, connection errors, …
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                logger.warning(
                    "MLflow did not take the training metrics (%d failure(s) so far): %s; training goes on, "
                    "and the records are sent again when it ends",
                    self.failures, " ".join(str(error).split())[:300],
                )  # fmt: skip
            return False
        return True

    def _send_tags(self) -> None:
        if self.unsent_tags and self._send(lambda: mlflow.set_tags(self.unsent_tags)):
            self.unsent_tags.clear()

    def __call__(self, metrics: dict[str, Any]) -> None:
        if "tags" in metrics:
            self.unsent_tags.update({key: str(value) for key, value in metrics["tags"].items()})
            self._send_tags()
            return
        values, step = metric_record(metrics)
        if values and self._send(lambda: mlflow.log_metrics(values, step=step)):
            self.seen.update((name, str(step)) for name in values)

    def replay(self, records: list[dict[str, Any]]) -> None:
        self._send_tags()
        for record in records:
            values, step = metric_record(record)
            if values and not all((name, str(step)) in self.seen for name in values):
                self(record)


def history_frame(history: list[dict[str, Any]], validation: list[dict[str, Any]]) -> pd.DataFrame:
    """Train and validation records in one long table (``phase`` column), ordered by step."""
    frames = [pd.DataFrame(history).assign(phase="train"), pd.DataFrame(validation).assign(phase="val")]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=["step", "phase"])
    table = pd.concat(frames, ignore_index=True).sort_values(["step", "phase"], kind="stable")
    columns = ["step", "phase", *[c for c in table.columns if c not in ("step", "phase")]]
    return table[columns].reset_index(drop=True)


def final_validation(validation: list[dict[str, Any]]) -> dict[str, float]:
    """Dice per dataset at the last validation step, for the bundle metadata and registry tags."""
    if not validation:
        return {}
    last = max(int(record["step"]) for record in validation)
    return {str(r["dataset"]): float(r["dice"]) for r in validation if int(r["step"]) == last}


def train_iris(
    episode_index: dict[str, Any],
    preprocessed_manifest: pd.DataFrame,
    params_model: dict[str, Any],
    params_train: dict[str, Any],
    params_preprocess: dict[str, Any] | None = None,
) -> tuple[ModelBundle, pd.DataFrame]:
    """Train Iris through the configured launcher; returns the model bundle and the training history.

    ``params_preprocess`` goes into the bundle's metadata, so ``iris segment`` prepares a new scan as
    the training volumes were prepared, from the bundle alone.
    """
    from iris_pipelines.launch import launch_training
    from iris_pipelines.training.loop import require_same_weights_on_every_rank

    preprocess = recorded_preprocessing(params_preprocess, preprocessed_manifest)

    model_config = build_model_config(params_model)
    node, train_config = split_train_params(params_train)
    launcher = node.get("launcher", "in_process")
    checksum = episode_index_checksum(episode_index)
    root = node.get("checkpoint_root", "data/06_models/checkpoints")
    ckpt = checkpoint_dir(
        root,
        model_config,
        train_config,
        checksum,
        parameter_layout(model_config),
        volumes=manifest_checksum(preprocessed_manifest),
    )
    logger.info("Training Iris with launcher %r; checkpoints in %s", launcher, ckpt)
    stream = MlflowMetricStream()
    result = launch_training(
        launcher,
        model_config=model_config,
        train_config=train_config,
        episode_index=episode_index,
        preprocessed_manifest=preprocessed_manifest,
        checkpoint_dir=ckpt,
        on_metrics=stream,
        **dict(node.get("launcher_options") or {}),
    )
    stream.replay([*result.history, *result.validation])
    # The bundle keeps rank 0's weights as the run's model: refused, whatever launcher ran the ranks, unless
    # every rank ended with them.
    require_same_weights_on_every_rank(result.weights_checksum, ckpt)
    metadata = {
        "launcher": launcher,
        "world_size": int(result.world_size),
        "final_step": int(result.final_step),
        "train_config": train_config,
        "episode_index_checksum": checksum,
        # evaluate refuses a query of these subjects: another index may split them into val or test.
        "train_subjects": train_subjects(episode_index),
        "weights_checksum": list(result.weights_checksum),
        "final_validation": final_validation(result.validation),
        "class_names": class_names(episode_index, result.class_ids),
        **({"preprocess": preprocess} if preprocess else {}),
    }
    bundle = ModelBundle(
        model_config=dict(result.model_config),
        state_dict=dict(result.state_dict),
        class_ids={str(k): int(v) for k, v in result.class_ids.items()},
        metadata=metadata,
    )
    return bundle, history_frame(result.history, result.validation)


def manifest_checksum(preprocessed_manifest: pd.DataFrame) -> str:
    """sha256 over the cases' cache keys (inputs + preprocessing params), order-independent."""
    column = "cache_key" if "cache_key" in preprocessed_manifest else None
    if column is None:
        payload = preprocessed_manifest.sort_index(axis=1).to_json(orient="records")
    else:
        payload = "\n".join(sorted(preprocessed_manifest[column].astype(str)))
    return hashlib.sha256(payload.encode()).hexdigest()


def episode_index_checksum(episode_index: Mapping[str, Any]) -> str:
    """The checksum of the index's content, recomputed: an index edited by hand (a subject moved into
    train) keeps its old ``checksum`` field, which would tag the run with, and resume the checkpoints of,
    the index it was before."""
    checksum = index_checksum(episode_index)
    recorded = str(episode_index.get("checksum", ""))
    if recorded and recorded != checksum:
        logger.warning(
            "episode_index: its content hashes to %s…, not to the %s… it records; it was edited after the "
            "episodes pipeline wrote it, and the content's checksum is used",
            checksum[:12], recorded[:12],
        )  # fmt: skip
    return checksum


def input_checksums(episode_index: Mapping[str, Any], preprocessed_manifest: pd.DataFrame) -> dict[str, str]:
    """The checksum tags of a run's inputs, as the model version and an evaluation run record them."""
    return {
        "episode_index_checksum": episode_index_checksum(episode_index),
        "preprocessed_manifest_checksum": manifest_checksum(preprocessed_manifest),
    }


def registry_tags(
    run: mlflow.entities.Run,
    bundle: ModelBundle,
    episode_index: dict[str, Any],
    preprocessed_manifest: pd.DataFrame,
) -> dict[str, str]:
    """Everything a reproducibility review asks of a model version, as string tags.

    Provenance (commit, dirty flag, lock hash, env) and input versions come from the run's tags, set by
    ``ProvenanceHooks`` and ``InputVersionHooks``; where the provenance hook did not run, they are
    computed here from the working directory.
    """
    run_tags = run.data.tags
    tags = {key: run_tags[key] for key in PROVENANCE_KEYS if key in run_tags}
    if len(tags) < len(PROVENANCE_KEYS):
        computed = provenance_tags(Path.cwd(), env=None)
        computed["kedro_env"] = "unknown"
        tags = {**computed, **tags}
    tags.update({key: value for key, value in run_tags.items() if key.startswith(INPUT_VERSION_TAG_PREFIX)})
    for name in ("episode_index", "preprocessed_manifest"):
        tags.setdefault(f"{INPUT_VERSION_TAG_PREFIX}{name}", "unversioned")
    tags.update(input_checksums(episode_index, preprocessed_manifest))
    tags["mlflow_run_id"] = run.info.run_id
    tags["final_step"] = str(bundle.metadata.get("final_step", ""))
    tags["world_size"] = str(bundle.metadata.get("world_size", ""))
    tags["weights_sha256"] = bundle.weights_checksum
    for dataset, dice in bundle.metadata.get("final_validation", {}).items():
        tags[f"val_dice.{mlflow_name(dataset)}"] = f"{dice:.6f}"
    return tags


def _pip_requirements() -> list[str]:
    """Pinned from the running environment: mlflow's own inference re-runs the model in a subprocess.
    MONAI runs the sliding window over the query."""
    from importlib.metadata import version

    names = ("mlflow", "torch", "safetensors", "numpy", "monai")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def _package_code(scratch: Path) -> Path:
    """A clean copy of this package for the pyfunc's ``code_paths``: the model's code imports
    ``iris_pipelines``, which ``mlflow models serve`` or a colleague's environment does not have."""
    target = scratch / "code" / PACKAGE_DIR.name
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def register_model(
    iris_model: ModelBundle,
    episode_index: dict[str, Any],
    preprocessed_manifest: pd.DataFrame,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """Log the bundle to the active MLflow run and register it as a pickle-free pyfunc.

    The version is created with all its tags in one registry request: tagged one request at a time, a
    failure midway (a timeout, a server restart) left a version without its provenance or weights hash.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(
            "register_model needs an active MLflow run; kedro-mlflow opens one per `kedro run`"
        )
    run = mlflow.get_run(run.info.run_id)
    name = parameters.get("train", {}).get("registry_name", "iris")
    tags = registry_tags(run, iris_model, episode_index, preprocessed_manifest)
    with tempfile.TemporaryDirectory(prefix="iris-register-") as scratch:
        bundle_dir = iris_model.save(Path(scratch) / BUNDLE_ARTIFACT)  # the folder name is the pyfunc's path
        mlflow.log_artifacts(str(bundle_dir), artifact_path=BUNDLE_ARTIFACT)
        config_file = Path(scratch) / "parameters.json"
        config_file.write_text(json.dumps(parameters, indent=2, sort_keys=True, default=str))
        mlflow.log_artifact(str(config_file), artifact_path="config")
        if "lockfile_sha256" not in run.data.tags and (Path.cwd() / LOCK_FILE).exists():
            mlflow.log_artifact(str(Path.cwd() / LOCK_FILE), artifact_path="environment")
        with warnings.catch_warnings():
            # An input example would make MLflow run a whole segmentation while logging; the signature
            # already states the params, and predict checks its arrays itself.
            warnings.filterwarnings(
                "ignore", message=r".*An input example was not provided", category=UserWarning
            )
            info = mlflow.pyfunc.log_model(
                name="iris",
                python_model=str(PYFUNC_SOURCE),
                artifacts={"bundle": str(bundle_dir)},
                code_paths=[str(_package_code(Path(scratch)))],
                pip_requirements=_pip_requirements(),
                # Without a signature MLflow drops predict's params (``threshold``) with only a warning.
                signature=SIGNATURE,
                model_config=MODEL_CONFIG,
            )
    # The registration log_model(registered_model_name=…) makes, with the tags in the same request.
    registered = mlflow.register_model(f"models:/{info.model_id}", name, tags=tags)
    version = str(registered.version)
    logger.info("Registered %s version %s from run %s", name, version, run.info.run_id)
    return {
        "name": name,
        "version": version,
        "run_id": run.info.run_id,
        "model_uri": f"models:/{name}/{version}",
        # embed_tasks/evaluate load this and iris_model as separate "latest" versions; a train run whose
        # registration failed leaves a newer iris_model beside this entry, and the checksum exposes that.
        "weights_sha256": iris_model.weights_checksum,
    }
