"""``IrisModelBundleDataset`` saves and loads a trained Iris as a versioned bundle directory.

The value is a :class:`~iris_pipelines.inference.bundle.ModelBundle`; on disk it is the bundle's
directory (``weights.safetensors`` + ``config.json``, no pickle). Versioned like any kedro-datasets
file dataset: ``<filepath>/<version>/<name of filepath>/`` is the bundle directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
)
from kedro_datasets._typing import JSONPreview

from iris_pipelines.datasets._filesystem import open_filesystem
from iris_pipelines.inference.bundle import CONFIG_FILE, BundleError, ModelBundle


class IrisModelBundleDataset(AbstractVersionedDataset[ModelBundle, ModelBundle]):
    """A trained Iris model as a safetensors + JSON bundle directory.

    Examples:
        ```yaml
        iris_model:
          type: iris_pipelines.datasets.IrisModelBundleDataset
          filepath: ${globals:data_root}/06_models/iris_model
          versioned: true
        ```

    Args:
        filepath: directory path with a protocol prefix understood by ``fsspec`` (local when none).
        version: a ``kedro.io.core.Version``; ``None`` load means the latest, ``None`` save a new one.
        credentials: passed to the ``fsspec`` filesystem.
        fs_args: passed to the ``fsspec`` filesystem constructor.
        metadata: free-form, ignored by Kedro.
    """

    def __init__(
        self,
        *,
        filepath: str | os.PathLike[str],
        version: Version | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._protocol, path, self._fs = open_filesystem(filepath, version, credentials, fs_args)
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._bundle_exists,
            glob_function=self._fs.glob,
        )

    def _bundle_exists(self, path: str) -> bool:
        """A version counts only once its config is in place, so a failed save is never 'latest'."""
        return self._fs.exists(f"{path}/{CONFIG_FILE}")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "version": self._version}

    def load(self) -> ModelBundle:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        try:
            if self._protocol == "file":
                return ModelBundle.load(load_path)
            with tempfile.TemporaryDirectory(prefix="iris-bundle-") as scratch:
                local = Path(scratch) / PurePosixPath(load_path).name
                self._fs.get(load_path, str(local), recursive=True)
                return ModelBundle.load(local)
        except BundleError as error:
            raise DatasetError(str(error)) from error

    def save(self, data: ModelBundle) -> None:
        if not isinstance(data, ModelBundle):
            raise DatasetError(
                f"{self.__class__.__name__} saves ModelBundle objects, got {type(data).__name__}"
            )
        save_path = get_filepath_str(self._get_save_path(), self._protocol)
        if self._protocol == "file":
            data.save(save_path)
        else:
            with tempfile.TemporaryDirectory(prefix="iris-bundle-") as scratch:
                local = data.save(Path(scratch) / "bundle")
                self._fs.makedirs(save_path, exist_ok=True)
                # Weights first, config last: a reader takes the directory as complete only with its config.
                for item in sorted(local.iterdir(), key=lambda p: p.name == CONFIG_FILE):
                    self._fs.put(str(item), f"{save_path}/{item.name}")
        self._invalidate_cache()

    def preview(self) -> JSONPreview:
        """The bundle's ``config.json`` (model config, class ids, metadata, weights checksum) for kedro-viz.

        kedro-viz picks the preview widget from the return annotation; the weights are never read.
        """
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        try:
            with self._fs.open(f"{load_path}/{CONFIG_FILE}", mode="r", encoding="utf-8") as config:
                document = json.load(config)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DatasetError(f"model bundle {load_path}: cannot read {CONFIG_FILE} ({error})") from error
        return JSONPreview(json.dumps(document))

    def _exists(self) -> bool:
        try:
            load_path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._bundle_exists(load_path)

    def _release(self) -> None:
        super()._release()
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        """Invalidate underlying filesystem caches."""
        filepath = get_filepath_str(self._filepath, self._protocol)
        self._fs.invalidate_cache(filepath)
