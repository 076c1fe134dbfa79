"""``MedicalImageDataset`` loads and saves 3-D volumes (NIfTI, MetaImage, NRRD; DICOM series on load).

Reading and writing go through :mod:`iris_pipelines.imaging.io`, so a catalog load gives the same clear
errors as ingest, and a save is atomic on the local filesystem.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import SimpleITK as sitk
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
)

from iris_pipelines.datasets._filesystem import open_filesystem
from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.io import detached_data_files, read_image, write_image

_DETACHED_HEADERS = (".mhd", ".nhdr")


def _pixel_type(value: int | str | None) -> int | None:
    """Accept ``sitk.sitkFloat32`` or its name as written in YAML (``sitkFloat32``)."""
    if value is None or isinstance(value, int):
        return value
    pixel_id = getattr(sitk, value, None)
    if not isinstance(pixel_id, int) or not value.startswith("sitk"):
        raise DatasetError(f"unknown SimpleITK pixel type {value!r}; use a name like 'sitkFloat32'")
    return pixel_id


class MedicalImageDataset(AbstractVersionedDataset[sitk.Image, sitk.Image]):
    """A 3-D medical volume as a ``SimpleITK.Image``, geometry included.

    Examples:
        ```yaml
        ct_scan:
          type: iris_pipelines.datasets.MedicalImageDataset
          filepath: data/02_intermediate/ct.nii.gz
          load_args:
            pixel_type: sitkFloat32
          save_args:
            compress: true
          versioned: true
        ```

    Args:
        filepath: path with a protocol prefix understood by ``fsspec`` (local when none); the suffix
            picks the format (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``), and a
            directory is read as a DICOM series.
        load_args: ``pixel_type``: SimpleITK pixel type (id or name) to cast to while reading.
        save_args: ``compress``: compress the written file (default true).
        version: a ``kedro.io.core.Version``; ``None`` load means the latest, ``None`` save a new one.
        credentials: passed to the ``fsspec`` filesystem.
        fs_args: passed to the ``fsspec`` filesystem constructor.
        metadata: free-form, ignored by Kedro.
    """

    DEFAULT_LOAD_ARGS: dict[str, Any] = {"pixel_type": None}
    DEFAULT_SAVE_ARGS: dict[str, Any] = {"compress": True}

    def __init__(
        self,
        *,
        filepath: str | os.PathLike[str],
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
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
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )
        self._load_args = {**self.DEFAULT_LOAD_ARGS, **(load_args or {})}
        self._save_args = {**self.DEFAULT_SAVE_ARGS, **(save_args or {})}
        unknown = (set(self._load_args) - set(self.DEFAULT_LOAD_ARGS)) | (
            set(self._save_args) - set(self.DEFAULT_SAVE_ARGS)
        )
        if unknown:
            raise DatasetError(f"unknown load/save arguments {sorted(unknown)} for {self.__class__.__name__}")
        self._pixel_type = _pixel_type(self._load_args["pixel_type"])

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "load_args": self._load_args,
            "save_args": self._save_args,
            "version": self._version,
        }

    def load(self) -> sitk.Image:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        if self._protocol == "file":
            return read_image(load_path, pixel_type=self._pixel_type)
        # ITK reads only local files, so remote volumes are copied into a scratch directory first.
        with tempfile.TemporaryDirectory(prefix="iris-image-") as scratch:
            local = Path(scratch) / PurePosixPath(load_path).name
            if self._fs.isdir(load_path):
                self._fs.get(load_path, str(local), recursive=True)
            else:
                self._fs.get(load_path, str(local))
                self._get_data_files(load_path, local)
            return read_image(local, pixel_type=self._pixel_type)

    def save(self, data: sitk.Image) -> None:
        if not isinstance(data, sitk.Image):
            raise DatasetError(f"{self.__class__.__name__} saves SimpleITK images, got {type(data).__name__}")
        save_path = get_filepath_str(self._get_save_path(), self._protocol)
        if self._protocol == "file":
            write_image(data, save_path, compress=self._save_args["compress"])
        else:
            with tempfile.TemporaryDirectory(prefix="iris-image-") as scratch:
                local = Path(scratch) / PurePosixPath(save_path).name
                write_image(data, local, compress=self._save_args["compress"])
                parent = str(PurePosixPath(save_path).parent)
                self._fs.makedirs(parent, exist_ok=True)
                # Data files first, the named file last, as in write_image.
                for item in sorted(Path(scratch).iterdir(), key=lambda p: p.name == local.name):
                    self._fs.put(str(item), f"{parent}/{item.name}")
        self._invalidate_cache()

    def _uri(self, path: str) -> str:
        """``path`` with its protocol, once: fsspec keeps http(s) URLs whole and strips other schemes."""
        return path if "://" in path else f"{self._protocol}://{path}"

    def _get_data_files(self, load_path: str, local: Path) -> None:
        """Copy the voxel files a detached header (``.mhd``, ``.nhdr``) names next to its local copy, under
        the names it gives them (another stem, LIST or pattern slices, a subfolder)."""
        if not local.name.lower().endswith(_DETACHED_HEADERS):
            return
        # Not PurePosixPath(...).parent: an http(s) path keeps its scheme, whose "//" it would collapse.
        parent = load_path.rsplit("/", 1)[0]
        for name in detached_data_files(local):
            relative = PurePosixPath(name)
            if relative.is_absolute() or ".." in relative.parts:
                raise InvalidInputError(
                    self._uri(load_path),
                    "unsupported_format",
                    f"the header names the data file {name} outside its own folder, which cannot be "
                    "fetched from a remote filesystem; keep the data files beside or below the header",
                )
            remote = f"{parent}/{relative}"
            # MetaIO also reads a gzip- or compress-ed copy of the named file.
            found = next((c for c in (remote, f"{remote}.gz", f"{remote}.Z") if self._fs.exists(c)), None)
            if found is None:
                raise InvalidInputError(
                    self._uri(load_path),
                    "missing_file",
                    f"the data file {name} that the header names does not exist "
                    f"({self._uri(remote)}); copy it next to the header or correct the header",
                )
            target = local.parent / relative.parent / PurePosixPath(found).name
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fs.get(found, str(target))

    def _exists(self) -> bool:
        try:
            load_path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(load_path)

    def _release(self) -> None:
        super()._release()
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        """Invalidate underlying filesystem caches."""
        filepath = get_filepath_str(self._filepath, self._protocol)
        self._fs.invalidate_cache(filepath)
