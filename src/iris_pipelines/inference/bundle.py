"""A trained Iris model on disk: safetensors weights plus a JSON config, loaded with no pickle.

DESIGN.md ("Model artifacts") asks that a model can be rebuilt years later from data files alone, so a
bundle is a directory with exactly two files:

* ``weights.safetensors``: the ``state_dict`` (contiguous CPU tensors, loaded without executing code),
* ``config.json``: the :class:`~iris_pipelines.model.IrisConfig` dict, the class-id table of the memory
  bank, free metadata (run facts, train params, class names) and the format version and weights checksum.

The catalog keeps each version of ``iris_model`` as ``<folder>/<version>/iris_model``;
:func:`bundle_directory` takes either that folder or one bundle.

Writes are atomic (a temporary sibling directory renamed into place), so a crash never leaves a half
written bundle where a reader would find it. Nothing here imports Kedro or MLflow.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from iris_pipelines.model import Iris, IrisConfig

FORMAT = "iris-model-bundle"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
DEFAULT_WINDOW = 128  # the paper's window, when the bundle does not record its training crop
CONFIG_FILE = "config.json"
# The preprocessing settings training records in ``metadata["preprocess"]``: what `iris segment` needs to
# prepare a new scan as the training volumes were prepared.
PREPROCESS_KEYS = ("target_spacing", "ct_window", "percentiles")

logger = logging.getLogger(__name__)


class BundleError(ValueError):
    """A model bundle is missing, incomplete or does not match its own config."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies: safetensors refuses tensors that share storage."""
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise BundleError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[name] = value.detach().to("cpu").contiguous().clone()
    return tensors


@dataclass
class ModelBundle:
    """Everything needed to rebuild a trained :class:`~iris_pipelines.model.Iris`.

    Attributes:
        model_config: ``IrisConfig.to_dict()`` of the trained network.
        state_dict: its weights (and buffers such as the task-embedding memory bank).
        class_ids: ``"dataset/label_value"`` → memory-bank slot, for in-context inference on training
            classes without references.
        metadata: JSON-safe facts about how the model was made (final step, world size, train params).
    """

    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    class_ids: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls, model: Iris, class_ids: dict[str, int] | None = None, metadata: dict[str, Any] | None = None
    ) -> ModelBundle:
        return cls(
            model.config.to_dict(), dict(model.state_dict()), dict(class_ids or {}), dict(metadata or {})
        )

    @property
    def weights_checksum(self) -> str:
        """The training's checksum of the final weights (``metadata``), which every embedding and metric
        row and the registry entry carry; empty for a bundle not made by training."""
        checksums = self.metadata.get("weights_checksum") or [""]
        return str(checksums[0])

    @property
    def class_names(self) -> dict[str, str]:
        """``"dataset/label_value"`` → the class name the training index gave it; empty for bundles made
        before training recorded names."""
        return {str(key): str(name) for key, name in (self.metadata.get("class_names") or {}).items()}

    def training_crop(self) -> tuple[int, int, int] | None:
        """The crop the network was trained on, as the metadata records it; None when it records none."""
        crop = (self.metadata or {}).get("train_config", {}).get("crop_size")
        if crop is None:
            return None
        values = [int(v) for v in (crop if isinstance(crop, list | tuple) else [crop])]
        return tuple(values * 3 if len(values) == 1 else values)  # type: ignore[return-value]

    def inference_window(self) -> tuple[int, int, int]:
        """The window to encode references and segment queries in: the training crop (the context the
        network learned from), else DEFAULT_WINDOW³."""
        return self.training_crop() or (DEFAULT_WINDOW,) * 3

    def config_document(self, weights_sha256: str) -> dict[str, Any]:
        """The JSON written next to the weights; the checksum lets ``load`` detect a swapped file."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": self.model_config,
            "class_ids": self.class_ids,
            "metadata": self.metadata,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": weights_sha256,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the bundle to ``directory`` atomically, replacing an older bundle there."""
        IrisConfig.from_dict(self.model_config)  # fail before writing anything if the config is wrong
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not mkdtemp: its 0700 would survive the rename and hide the model from the project's group.
        scratch = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        scratch.mkdir()
        try:
            weights = scratch / WEIGHTS_FILE
            # safetensors metadata is string→string and public: only the format, never params or paths.
            save_file(_plain_tensors(self.state_dict), str(weights), metadata={"format": "pt"})
            # safetensors writes 0600; give the weights the umask's mode, which the new folder has.
            os.chmod(weights, scratch.stat().st_mode & 0o666)
            document = self.config_document(_sha256(weights))
            (scratch / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
            replace_directory(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ModelBundle:
        """Read a bundle written by :meth:`save`; errors name the file and what is wrong with it."""
        root = Path(directory)
        if not root.is_dir():
            raise BundleError(f"model bundle {root} does not exist or is not a directory")
        document = _read_config(root / CONFIG_FILE)
        weights = root / document.get("weights_file", WEIGHTS_FILE)
        if not weights.is_file():
            raise BundleError(f"model bundle {root}: weights file {weights} is missing")
        expected = document.get("weights_sha256")
        if expected and _sha256(weights) != expected:
            raise BundleError(f"{weights}: checksum does not match {root / CONFIG_FILE}; the file is corrupt")
        try:
            state_dict = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as error:
            raise BundleError(f"{weights}: not a readable safetensors file ({error})") from error
        return cls(
            model_config=document["model_config"],
            state_dict=state_dict,
            class_ids={str(k): int(v) for k, v in document.get("class_ids", {}).items()},
            metadata=document.get("metadata", {}),
        )

    def config(self) -> IrisConfig:
        """The network's configuration, read from the bundle without building the network."""
        try:
            return IrisConfig.from_dict(self.model_config)
        except (TypeError, ValueError) as error:
            raise BundleError(f"model bundle config is not a valid IrisConfig: {error}") from error

    def build_model(self) -> Iris:
        """The network in eval mode; a state_dict that does not fit the config is an error, not a warning."""
        model = Iris(self.config())
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            raise BundleError(f"model bundle weights do not fit its config: {error}") from error
        return model.eval()


def newest_version(folder: str | os.PathLike[str], complete: Callable[[Path], bool]) -> Path | None:
    """The newest complete version of a Kedro versioned folder ``<folder>/<version>/<folder name>``, as a
    catalog load without a version picks it: version names are timestamps that sort by time, and one that
    is not ``complete`` (a save that failed midway) is skipped. None when there is none."""
    root = Path(folder)
    found = sorted(root.glob(f"*/{glob.escape(root.name)}"), reverse=True)
    return next((path for path in found if complete(path)), None)


def bundle_directory(path: str | os.PathLike[str]) -> Path:
    """``path`` when it is one bundle, else the newest complete version under a versioned catalog folder
    (``data/06_models/iris_model``), logged; errors name both layouts."""
    root = Path(path)
    if not root.is_dir() or (root / CONFIG_FILE).is_file():
        return root  # ModelBundle.load names what is wrong with it
    version = newest_version(root, lambda candidate: (candidate / CONFIG_FILE).is_file())
    if version is None:
        raise BundleError(
            f"model bundle {root}: {CONFIG_FILE} is missing, and no version under it has one; expected a "
            f"bundle directory ({CONFIG_FILE}, {WEIGHTS_FILE}) or a versioned catalog folder "
            f"{root}/<version>/{root.name}/{CONFIG_FILE}"
        )
    logger.info("model bundle %s: using its newest complete version %s", root, version.parent.name)
    return version


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"model bundle {path.parent}: {path.name} is missing")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"{path}: not an Iris model bundle config (expected format {FORMAT!r})")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version!r} is newer than this code ({FORMAT_VERSION})"
        )
    if "model_config" not in document:
        raise BundleError(f"{path}: has no 'model_config'")
    return document


def replace_directory(source: Path, target: Path) -> None:
    """``os.replace`` for directories: a non-empty target is moved aside first, then deleted.

    If the second rename fails the old directory is put back, so ``target`` always holds one whole copy.
    """
    if not target.exists():
        os.replace(source, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, backup / target.name)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(backup / target.name, target)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
