"""kedro-datasets' file datasets, with saves that land whole or not at all.

The stock datasets open the target and write into it. A save that fails half-way (a column pyarrow
cannot convert, a full disk, Ctrl-C) leaves a truncated file, and for a versioned dataset that file is
then the *latest* version: every later unpinned load fails, although the previous version is intact.
These subclasses let the stock code write to a hidden scratch path beside the target and rename it into
place once the write has finished (``os.replace``, atomic on POSIX), so a failed save leaves the
previous state untouched and Kedro, which lists versions by the target's name, never sees the scratch.

Only local paths need this: object stores (s3, gcs, abfs) publish an object when its upload completes,
so remote targets are written directly, as the stock datasets do. A load that fails names the file (the
version) it read, which the stock error does not.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import DatasetError, get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset, ParquetDataset
from kedro_datasets.plotly import HTMLDataset
from kedro_datasets.text import TextDataset

from iris_pipelines.inference.bundle import replace_directory

SCRATCH_SUFFIX = ".partial"


class AtomicSaveMixin:
    """Redirects a file dataset's save to a scratch path beside the target, then renames it into place.

    Put it before the stock class (``class AtomicCSVDataset(AtomicSaveMixin, CSVDataset)``): the stock
    ``save`` runs unchanged and asks ``_get_save_path`` where to write, which answers the scratch path.
    A load that fails names the file it read: the stock error names the dataset's folder and save
    version, not the load version, so a corrupt latest version was not told from the intact ones.
    """

    def load(self) -> Any:
        # As in save: the stock load without Kedro's wrapper, which wraps this method already.
        stock_load = inspect.unwrap(super().load)  # type: ignore[misc]
        try:
            return stock_load(self)
        except DatasetError:  # no version to load, a write-only dataset: the stock message says so
            raise
        except Exception as exc:
            # The version the stock load resolved (cached), so the file it failed on.
            path = get_filepath_str(self._get_load_path(), self._protocol)  # type: ignore[attr-defined]
            hint = (
                "; if this version is damaged, delete its folder or load an earlier version "
                "(kedro run --load-versions=<dataset>:<version>)"
                if self._version  # type: ignore[attr-defined]
                else ""
            )
            raise DatasetError(
                f"Cannot load {path} ({type(self).__name__}): {type(exc).__name__}: {exc}{hint}"
            ) from exc

    _scratch_path: PurePosixPath | None = None

    def _get_save_path(self) -> PurePosixPath:
        if self._scratch_path is not None:
            return self._scratch_path
        return super()._get_save_path()  # type: ignore[misc]

    def save(self, data: Any) -> None:
        # The stock class's own save, without Kedro's logging and versioning wrappers: Kedro wraps this
        # method in them already, and running the versioning wrapper twice would draw a second version.
        stock_save = inspect.unwrap(super().save)  # type: ignore[misc]
        if self._protocol != "file":  # type: ignore[attr-defined]
            stock_save(self, data)
            return
        # Through a symlink to the file it names, as the stock open() writes: renaming onto the link
        # would replace the link and leave the shared file it points to stale.
        target = Path(os.path.realpath(self._get_save_path()))
        mode = str(getattr(self, "_fs_open_args_save", {}).get("mode", ""))
        self._require_writable(target, mode)
        scratch = target.parent / f".{target.name}.{uuid.uuid4().hex}{SCRATCH_SUFFIX}"
        self._scratch_path = PurePosixPath(scratch)
        try:
            if "a" in mode and target.is_file():
                shutil.copyfile(target, scratch)  # append mode appends to a copy, renamed in whole
            stock_save(self, data)
            if scratch.is_dir():  # a MatplotlibDataset given a list or dict of figures writes a folder
                replace_directory(scratch, target)
            elif scratch.exists():
                os.replace(scratch, target)
            else:  # an empty list or dict of figures writes nothing
                raise DatasetError(f"{target}: nothing was written (an empty list or dict of figures?)")
        except BaseException:
            if scratch.is_dir():
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                scratch.unlink(missing_ok=True)
            if self._version:  # type: ignore[attr-defined]
                # The version folder this save created; rmdir leaves it if anything else is inside.
                with contextlib.suppress(OSError):
                    target.parent.rmdir()
            raise
        finally:
            self._scratch_path = None
        self._invalidate_cache()  # type: ignore[attr-defined]

    def _require_writable(self, target: Path, mode: str) -> None:
        """The checks the stock save makes on the target, which it now makes on the scratch path."""
        if "x" in mode and target.exists():
            raise DatasetError(f"{target} exists, and open mode {mode!r} (exclusive) forbids overwriting it")
        if target.is_dir() and not isinstance(self, MatplotlibDataset):
            raise DatasetError(f"{target} is a directory; {type(self).__name__} saves a single file there")


class AtomicCSVDataset(AtomicSaveMixin, CSVDataset):
    """``pandas.CSVDataset`` whose saves are atomic on local paths."""


class AtomicParquetDataset(AtomicSaveMixin, ParquetDataset):
    """``pandas.ParquetDataset`` whose saves are atomic on local paths."""


class AtomicJSONDataset(AtomicSaveMixin, JSONDataset):
    """``json.JSONDataset`` whose saves are atomic on local paths."""


class AtomicTextDataset(AtomicSaveMixin, TextDataset):
    """``text.TextDataset`` whose saves are atomic on local paths."""


class AtomicHTMLDataset(AtomicSaveMixin, HTMLDataset):
    """``plotly.HTMLDataset`` whose saves are atomic on local paths."""


class AtomicMatplotlibDataset(AtomicSaveMixin, MatplotlibDataset):
    """``matplotlib.MatplotlibDataset`` whose saves are atomic on local paths.

    On a local path a list or dict of figures replaces the old folder whole, so ``overwrite`` is
    implied there; the stock option would try to delete the scratch folder, which does not exist yet.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self._protocol == "file":
            self._overwrite = False
